"""x-transformers: a full-attention transformer with research features, one keyword each."""

from .attend import BackendNotSupported, attend, attend_backend
from .autoregressive import AutoregressiveWrapper
from .cache import KVCache, StaticKVCache
from .config import ConfigConflictError
from .continuous import ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper
from .dpo import DPO
from .entropy_based_tokenizer import EntropyBasedTokenizer
from . import flex as _flex  # noqa: F401 - registers the FlexAttention backend ahead of sdpa
from . import inductor_fix as _inductor_fix
from .funnel import FunnelEncoder
from .hf import load_tokenizer, save_pretrained
from .hub import from_pretrained
from .layers import AttentionLayers, CrossAttender, Decoder, Encoder, PrefixDecoder
from .layout import layer_schedule
from .multi_input import MultiInputTransformerWrapper
from .neo_mlp import NeoMLP
from .nonautoregressive_wrapper import NonAutoregressiveWrapper
from .vit import ViTransformerWrapper
from .wrappers import TransformerWrapper, XTransformer
from .xval import XValAutoregressiveWrapper, XValTransformerWrapper
from . import continuous_autoencoder as _continuous_autoencoder, gpt_vae as _gpt_vae  # noqa: F401 - for from_pretrained
from .x_transformers import Attention, FeedForward  # noqa: F401 - upstream exports these building blocks (not models: not in __all__)

__all__ = [
    "AttentionLayers", "Encoder", "Decoder", "CrossAttender", "FunnelEncoder", "TransformerWrapper", "XTransformer",
    "MultiInputTransformerWrapper", "NeoMLP", "ContinuousTransformerWrapper", "ContinuousAutoregressiveWrapper",
    "ViTransformerWrapper", "NonAutoregressiveWrapper", "PrefixDecoder", "XValTransformerWrapper",
    "XValAutoregressiveWrapper", "DPO", "EntropyBasedTokenizer",
    "KVCache", "StaticKVCache", "AutoregressiveWrapper",
    "attend", "attend_backend", "BackendNotSupported", "ConfigConflictError",
    "from_pretrained", "save_pretrained", "load_tokenizer", "layer_schedule",
]
__version__ = "0.1.0"

_inductor_fix.install()  # guards torch.compile on GPUs against pytorch#190517 (XT_INDUCTOR_FIX=0: off)
