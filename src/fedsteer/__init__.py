"""fedsteer: steer a frozen LLM with data that never leaves its owners."""

__version__ = "0.1.0"
