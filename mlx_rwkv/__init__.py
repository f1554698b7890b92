"""mlx-rwkv: fast RWKV-7 (x070) inference on MLX (Metal, CUDA, CPU) with Q4_K kernels."""
__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)

from .config import CheckpointError, ModelConfig
from .generate import GenerationChunk, NonFiniteLogitsError, generate, stream_generate
from .loading import load
from .model import RWKV7
from .sampling import SamplingParams
from .state import State, StateError
from .tokenizer import ByteTokenizer, WorldTokenizer

__all__ = [
    "__version__",
    "ByteTokenizer", "CheckpointError", "GenerationChunk", "ModelConfig", "NonFiniteLogitsError",
    "RWKV7", "SamplingParams", "State", "StateError", "WorldTokenizer", "generate", "load",
    "stream_generate",
]
