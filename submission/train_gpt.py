"""Challenge entry point: `torchrun --nproc_per_node=N submission/train_gpt.py [KEY=VALUE ...]` trains the recipe."""
from submission.train import main

if __name__ == "__main__":
    main()
