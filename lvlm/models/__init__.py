"""Models: vision encoders, connectors, LLM wrapper and their composition. Knows nothing of data files
or distribution."""
