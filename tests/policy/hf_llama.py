"""transformers' LlamaForCausalLM holding the same weights as one of our Llamas: the reference the parity
tests compare against. Eager attention, so no fused kernel hides a layout mix-up."""

import transformers

from rtloop.policy.llama import Llama


def hf_twin(ours: Llama) -> transformers.LlamaForCausalLM:
    a = ours.args
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
        intermediate_size=a.intermediate_size, rms_norm_eps=a.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        max_position_embeddings=a.max_position_embeddings, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)  # same key names: this is the layout check
    return hf
