"""Model components that read their shape from a Hugging Face folder's ``config.json``."""

from kdtune.models.hf_llama import (
    LLAMA_FAMILY,
    check_llama_family,
    llama_from_hf_config,
    llama_from_hf_folder,
    load_hf_folder,
    read_hf_state_dict,
)

__all__ = [
    "LLAMA_FAMILY",
    "check_llama_family",
    "llama_from_hf_config",
    "llama_from_hf_folder",
    "load_hf_folder",
    "read_hf_state_dict",
]
