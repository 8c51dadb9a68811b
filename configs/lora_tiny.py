"""LoRA fine-tuning of a tiny model (trained with configs/tiny.py) on the bundled
corpus, on a CPU in a minute.

python -m launch.train --config=configs/tiny.py --workdir=/tmp/tiny
python -m launch.train --config=configs/lora_tiny.py:/tmp/tiny --workdir=/tmp/tiny_lora

The argument after ':' is the frozen base's model directory (any kind). Data and
optimizer settings are configs/tiny.py's.
"""

from configs import tiny


def get_config(arg=None):
    c = tiny.get_config()
    c.model.model_dir = arg or ""
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = "all-linear"
    c.train.steps = 100
    c.train.warmup_steps = 10
    return c
