"""optprune: post-training pruning of LLMs where every method is a mathematical program."""
__version__ = "0.1.0"
