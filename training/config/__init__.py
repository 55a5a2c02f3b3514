"""The config floor: errors, node readers, the key schema, the phase-1 rules, loading."""
