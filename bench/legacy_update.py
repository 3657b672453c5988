"""The update path before issue 15, kept beside the benchmark that measures the new one against it (and for the
test that both give the same update), not in the stage: a full-vocabulary fp32 log-softmax on every position,
and a separate π_old pass over every sample."""

from __future__ import annotations

from maths.policy_loss import token_entropy, token_logprobs
from stages.update import Trainer


class LegacyTrainer(Trainer):
    def token_logp(self, model, b):
        logits, m = self.forward(model, b), b["mask"]
        return token_logprobs(logits, b["input_ids"]) * m, token_entropy(logits.detach()) * m

    def _old_logprobs(self, samples):
        for s, lp in zip(samples, self.logprobs(self.model, samples), strict=True):
            s.old_logp = lp
        return None
