"""Zero-shot evaluation: token scoring (`scorer`), text with lm-eval's conventions (`text`), the
lm-evaluation-harness model (`harness`, needs the `[eval]` extra), offline tasks (`tasks`)."""
