"""``python -m stages.update`` (and each torchrun rank): the update stage's CLI."""

from stages.update import main

main()
