"""Shipped YAML configs (package data). ``kdtune ls`` lists them."""
