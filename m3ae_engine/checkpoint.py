"""`python -m m3ae_engine.checkpoint export ...`: the checkpoint tools, m3ae_engine/train/checkpoint.py."""
from .train.checkpoint import main

if __name__ == "__main__":
    main()
