"""ChatGLM-6B configuration (SPEC §1)."""
from transformers import PretrainedConfig

__all__ = ["ChatGLMConfig"]


class ChatGLMConfig(PretrainedConfig):
    """Configuration of ChatGLM-6B and its INT8 / INT4 variants.

    ``quantization_bit`` 0 means FP16 block weights; 8 or 4 means the 28 blocks' linear
    weights are stored as int8 (packed int4) with per-row fp16 scales.
    """

    model_type = "chatglm"

    def __init__(
        self,
        vocab_size=130528,
        hidden_size=4096,
        num_layers=28,
        num_attention_heads=32,
        layernorm_epsilon=1e-5,
        use_cache=True,
        bos_token_id=130004,
        eos_token_id=130005,
        mask_token_id=130000,
        gmask_token_id=130001,
        pad_token_id=3,
        max_sequence_length=2048,
        inner_hidden_size=16384,
        position_encoding_2d=True,
        quantization_bit=0,
        quantization_embeddings=False,
        pre_seq_len=None,
        prefix_projection=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit or 0
        self.quantization_embeddings = quantization_embeddings
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        # The official config.json maps AutoModel and AutoModelForSeq2SeqLM only; tools that load causal
        # LMs (AutoModelForCausalLM: lm-eval, TRL, ...) then fail with "Unrecognized configuration class".
        # The model generates left to right from its prompt, so that class gets the same target.
        auto_map = getattr(self, "auto_map", None)
        if isinstance(auto_map, dict) and "AutoModel" in auto_map and "AutoModelForCausalLM" not in auto_map:
            self.auto_map = dict(auto_map, AutoModelForCausalLM=auto_map["AutoModel"])
        self.validate_chatglm()

    # Named so it never collides with PretrainedConfig.validate (transformers 5.x).
    def validate_chatglm(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 4:
            raise ValueError(f"head dim {head_dim} must be a multiple of 4 for the 2-D rotary embedding")
        if self.quantization_bit not in (0, 4, 8):
            raise ValueError(f"quantization_bit must be 0 (FP16), 4 or 8; config.json says {self.quantization_bit!r}")
        if self.quantization_embeddings:
            raise NotImplementedError("quantization_embeddings=true (the chatglm-6b-int4-qe variant) is not "
                                      "supported; use chatglm-6b-int8 / chatglm-6b-int4 / chatglm-6b")
        if not self.position_encoding_2d:
            raise NotImplementedError("only position_encoding_2d=true (ChatGLM-6B) is supported")
        if self.pre_seq_len is not None and int(self.pre_seq_len) <= 0:
            raise ValueError(f"pre_seq_len must be a positive integer or null, got {self.pre_seq_len!r}")
