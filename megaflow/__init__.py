"""megaflow: online GRPO-family reinforcement learning for flow-matching video generators."""

__version__ = "0.1.0"
