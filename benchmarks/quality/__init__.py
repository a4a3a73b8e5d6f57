"""Quality on a real model (issue #9): a small byte-level GPT trained with AdaAttn and with torch SDPA.

    python3 -m benchmarks.quality.run --out DIR          # data → train both → evaluate → capture → DIR/quality.json

Modules, one concern each: `data` (the offline corpus), `model` (the GPT, attention pluggable), `train`
(training runs and the agreement criterion), `evaluate` (perplexity and per-head statistics per policy),
`activations` (capture and `load_activations`), `run` (the command), `table` (README table).
"""

from .activations import default_activations_path, load_activations

__all__ = ["default_activations_path", "load_activations"]
