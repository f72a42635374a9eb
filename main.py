"""Few-shot CLIP adaptation with any registered lora_zoo method: train and evaluate one run.

    python main.py --method lora --root_path DATA --dataset dtd --shots 4 --seed 1
    python main.py --method nora --help        # every setting of NoRA with its default

The command line itself lives in ``lora_zoo/cli.py`` (shared with ``main_nora.py``,
``main_aira.py`` and the sweep's planning).
"""
from lora_zoo.cli import build_parser, main, parse_config, run  # noqa: F401  (the entry points tests call)

if __name__ == "__main__":
    main()
