"""The embedded default task: a synthetic corpus with known next-token distributions."""
