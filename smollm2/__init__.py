"""SmolLM2-135M-Instruct as a real teacher: fetch, convert, tokenise, prune, demo."""
