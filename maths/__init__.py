"""Pure, I/O-free RL maths: estimators, rewards, similarity, segment reductions, policy loss, sample layout, eval metrics, prompts."""
