"""The default engine on more `transformers` families than the model zoo holds: exactness and fallbacks.

Each family is built from a small config with random weights (seed 0) and scored on one random batch
of 8 (images, videos, spectrograms, raw audio or multichannel series N(0, 1), or token ids uniform in
[3, 100), the last one the end-of-sequence id 2 for the models that pool there; seed 1; class targets
below 3, one per pixel of the segmentation model's logits, whose loss is the pixels' mean cross-entropy).
Language-model heads (causal, or BART's decoder) are scored on their last token's first three logits,
the Switch Transformers encoder through a Linear head on its mean token, PatchTST on its
``prediction_logits``.
Measured per family:
- the default engine's GradSign relative to the loop's in float32, and whether the two give the same
  total in float64 (model and floating inputs in double precision);
- the fallback, if any, with the cause the warning names, or the error that refuses the model, and
  whether the default engine warned that float32 rounding decides many signs (the share it names);
- where the float64 totals differ, the layers whose counts differ and by how much;
- the share of the model's parameters in counted weights (Conv2d and Linear: other layer types, such
  as GPT-2's `Conv1D`, are not counted by GradSign's definition);
- the largest |dL/dW| of the first sample over the counted weights, in float64: of the size of
  rounding noise (1e-17..1e-15) where the output does not depend on the weights in exact arithmetic
  (e.g. a BatchNorm right before global pooling gives its bias for every single sample), so that every
  count is a sign of rounding noise and any two implementations differ.

    python bench/families.py [--families a,b] [--write]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradsign
from gradsign.engine import counted_layers, scoring_mode

from doc_sections import engine_version, write_section
from zoo import _Logits, float64_diagnosis, rounding_note, rounding_noise_share, score_with_warnings

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- families:begin (written by bench/families.py) -->", "<!-- families:end -->"
INTRO = ("### More `transformers` families: exactness and fallbacks\n\n"
         "Small configs of families outside the zoo, scored on a batch of 8 (the protocol is in the docstring\n"
         "of `bench/families.py`); no timings.\n\n")
IMAGE = {"num_labels": 3}
SPEECH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
          "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
          "num_conv_pos_embedding_groups": 4, "num_labels": 3}
TEXT = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "num_labels": 3, "max_position_embeddings": 64}


class _LastToken(nn.Module):
    """A causal language model's logits at the last token, its first three as the classes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits[:, -1, :3]


class _MeanTokenHead(nn.Module):
    """An encoder's mean output token through a Linear head of three classes."""

    def __init__(self, encoder: nn.Module, width: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))


class _PredictionLogits(nn.Module):
    """The ``prediction_logits`` field of a model's output (PatchTST's classifier names its logits so)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).prediction_logits


def _families(t) -> dict[str, tuple]:
    """name -> (builder, input kind, input shape); ``t`` is the transformers module."""
    image, tokens = "image", "tokens"
    return {
        "DeiT": (lambda: t.DeiTForImageClassification(t.DeiTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, **IMAGE)), image, (3, 32, 32)),
        "BEiT": (lambda: t.BeitForImageClassification(t.BeitConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, use_relative_position_bias=True, **IMAGE)), image, (3, 32, 32)),
        "DINOv2": (lambda: t.Dinov2ForImageClassification(t.Dinov2Config(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            **IMAGE)), image, (3, 32, 32)),
        "ConvNeXtV2": (lambda: t.ConvNextV2ForImageClassification(t.ConvNextV2Config(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=2, **IMAGE)), image, (3, 32, 32)),
        "LeViT": (lambda: t.LevitForImageClassification(t.LevitConfig(
            image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], **IMAGE)), image, (3, 64, 64)),
        "PoolFormer": (lambda: t.PoolFormerForImageClassification(t.PoolFormerConfig(
            hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], **IMAGE)), image, (3, 32, 32)),
        "MobileNetV1": (lambda: t.MobileNetV1ForImageClassification(t.MobileNetV1Config(
            image_size=64, depth_multiplier=0.25, **IMAGE)), image, (3, 64, 64)),
        "SegFormer": (lambda: t.SegformerForImageClassification(t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
            patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], **IMAGE)), image, (3, 32, 32)),
        "SegFormer (segmentation)": (lambda: t.SegformerForSemanticSegmentation(t.SegformerConfig(
            num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[4, 2, 1, 1], hidden_sizes=[8, 16, 24, 32],
            num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16, **IMAGE)), "segmentation", (3, 64, 64)),
        "BiT": (lambda: t.BitForImageClassification(t.BitConfig(
            embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="preactivation", num_groups=8,
            **IMAGE)), image, (3, 32, 32)),
        "ResNet (bottleneck)": (lambda: t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck", **IMAGE)),
            image, (3, 32, 32)),
        "RegNetY": (lambda: t.RegNetForImageClassification(t.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, layer_type="y", **IMAGE)),
            image, (3, 32, 32)),
        "Swinv2": (lambda: t.Swinv2ForImageClassification(t.Swinv2Config(
            image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, **IMAGE)),
            image, (3, 32, 32)),
        "FocalNet": (lambda: t.FocalNetForImageClassification(t.FocalNetConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], **IMAGE)), image, (3, 32, 32)),
        "PVTv2": (lambda: t.PvtV2ForImageClassification(t.PvtV2Config(
            image_size=32, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2], sr_ratios=[2, 1],
            patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], num_encoder_blocks=2, **IMAGE)),
            image, (3, 32, 32)),
        "MobileViTV2": (lambda: t.MobileViTV2ForImageClassification(t.MobileViTV2Config(
            image_size=64, width_multiplier=0.5, **IMAGE)), image, (3, 64, 64)),
        "DistilBERT": (lambda: t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3, max_position_embeddings=64)),
            tokens, (12,)),
        "RoBERTa": (lambda: t.RobertaForSequenceClassification(t.RobertaConfig(**TEXT)), tokens, (12,)),
        "ALBERT": (lambda: t.AlbertForSequenceClassification(t.AlbertConfig(embedding_size=16, **TEXT)),
                   tokens, (12,)),
        "ELECTRA": (lambda: t.ElectraForSequenceClassification(t.ElectraConfig(embedding_size=16, **TEXT)),
                    tokens, (12,)),
        "DeBERTa-v2": (lambda: t.DebertaV2ForSequenceClassification(t.DebertaV2Config(
            relative_attention=True, pos_att_type=["p2c", "c2p"], **TEXT)), tokens, (12,)),
        "MPNet": (lambda: t.MPNetForSequenceClassification(t.MPNetConfig(**TEXT)), tokens, (12,)),
        "Funnel": (lambda: t.FunnelForSequenceClassification(t.FunnelConfig(
            vocab_size=100, block_sizes=[1, 1], d_model=32, n_head=2, d_head=16, d_inner=64, num_labels=3)),
            tokens, (12,)),
        "GPT-2": (lambda: t.GPT2ForSequenceClassification(t.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, pad_token_id=0,
            bos_token_id=1, eos_token_id=1)), tokens, (12,)),
        "Llama": (lambda: t.LlamaForSequenceClassification(t.LlamaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, num_labels=3, pad_token_id=0, max_position_embeddings=64)), tokens, (12,)),
        "OPT": (lambda: t.OPTForSequenceClassification(t.OPTConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, num_labels=3,
            pad_token_id=1, max_position_embeddings=64, word_embed_proj_dim=32)), tokens, (12,)),
        "BLOOM": (lambda: t.BloomForSequenceClassification(t.BloomConfig(
            vocab_size=100, hidden_size=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)), tokens, (12,)),
        "Data2VecVision": (lambda: t.Data2VecVisionForImageClassification(t.Data2VecVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, **IMAGE)), image, (3, 32, 32)),
        "CLIP (vision)": (lambda: t.CLIPForImageClassification(t.CLIPConfig(
            vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "intermediate_size": 64},
            text_config={"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 64}, **IMAGE)), image, (3, 32, 32)),
        "ViT-MSN": (lambda: t.ViTMSNForImageClassification(t.ViTMSNConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, **IMAGE)), image, (3, 32, 32)),
        "Wav2Vec2": (lambda: t.Wav2Vec2ForSequenceClassification(t.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
            num_labels=3)), "audio", (1600,)),
        "SqueezeBERT": (lambda: t.SqueezeBertForSequenceClassification(t.SqueezeBertConfig(embedding_size=32, **TEXT)),
                        tokens, (12,)),
        "MobileBERT": (lambda: t.MobileBertForSequenceClassification(t.MobileBertConfig(
            embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2, **TEXT)),
            tokens, (12,)),
        "ConvBERT": (lambda: t.ConvBertForSequenceClassification(t.ConvBertConfig(embedding_size=32, **TEXT)),
                     tokens, (12,)),
        "XLM-RoBERTa": (lambda: t.XLMRobertaForSequenceClassification(t.XLMRobertaConfig(**TEXT)), tokens, (12,)),
        "BigBird (full attention)": (lambda: t.BigBirdForSequenceClassification(t.BigBirdConfig(
            attention_type="original_full", **TEXT)), tokens, (12,)),
        "Nystromformer": (lambda: t.NystromformerForSequenceClassification(t.NystromformerConfig(
            num_landmarks=4, segment_means_seq_len=12, **TEXT)), tokens, (12,)),
        "Mistral": (lambda: t.MistralForSequenceClassification(t.MistralConfig(
            num_key_value_heads=1, pad_token_id=0, **TEXT)), tokens, (12,)),
        "Qwen2": (lambda: t.Qwen2ForSequenceClassification(t.Qwen2Config(
            num_key_value_heads=1, pad_token_id=0, **TEXT)), tokens, (12,)),
        "GPT-Neo": (lambda: t.GPTNeoForSequenceClassification(t.GPTNeoConfig(
            vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
            window_size=4, num_labels=3, pad_token_id=0, max_position_embeddings=64)), tokens, (12,)),
        "SwiftFormer": (lambda: t.SwiftFormerForImageClassification(t.SwiftFormerConfig(
            depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], **IMAGE)), image, (3, 64, 64)),
        "Hiera": (lambda: t.HieraForImageClassification(t.HieraConfig(
            image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3], embed_dim=16,
            num_heads=[1, 2], depths=[1, 1], embed_dim_multiplier=2.0, num_query_pool=1, query_stride=[2, 2],
            masked_unit_size=[8, 8], masked_unit_attention=[True, False], **IMAGE)), image, (3, 64, 64)),
        "PVT": (lambda: t.PvtForImageClassification(t.PvtConfig(
            image_size=32, num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1],
            hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
            **IMAGE)), image, (3, 32, 32)),
        "DINOv2 (registers)": (lambda: t.Dinov2WithRegistersForImageClassification(t.Dinov2WithRegistersConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            num_register_tokens=2, **IMAGE)), image, (3, 32, 32)),
        "I-JEPA": (lambda: t.IJepaForImageClassification(t.IJepaConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, **IMAGE)), image, (3, 32, 32)),
        "AST": (lambda: t.ASTForAudioClassification(t.ASTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=32,
            num_mel_bins=16, patch_size=8, frequency_stride=8, time_stride=8, num_labels=3)), "audio", (32, 16)),
        "Whisper (audio)": (lambda: t.WhisperForAudioClassification(t.WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
            decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, vocab_size=100,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, num_labels=3)),
            "audio", (16, 32)),
        "HuBERT": (lambda: t.HubertForSequenceClassification(t.HubertConfig(**SPEECH)), "audio", (1600,)),
        "WavLM": (lambda: t.WavLMForSequenceClassification(t.WavLMConfig(**SPEECH)), "audio", (1600,)),
        "SEW-D": (lambda: t.SEWDForSequenceClassification(t.SEWDConfig(squeeze_factor=2, **SPEECH)), "audio",
                  (1600,)),
        "BART": (lambda: t.BartForSequenceClassification(t.BartConfig(
            vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)), "tokens+eos", (12,)),
        "T5": (lambda: t.T5ForSequenceClassification(t.T5Config(
            vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, num_labels=3,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)), "tokens+eos", (12,)),
        "Longformer": (lambda: t.LongformerForSequenceClassification(t.LongformerConfig(attention_window=4, **TEXT)),
                       tokens, (12,)),
        "XLNet": (lambda: t.XLNetForSequenceClassification(t.XLNetConfig(
            vocab_size=100, d_model=32, n_layer=2, n_head=2, d_inner=64, num_labels=3)), tokens, (12,)),
        "FNet": (lambda: t.FNetForSequenceClassification(t.FNetConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_labels=3,
            max_position_embeddings=64, use_tpu_fourier_optimizations=False)), tokens, (12,)),
        "RoFormer": (lambda: t.RoFormerForSequenceClassification(t.RoFormerConfig(embedding_size=32, **TEXT)),
                     tokens, (12,)),
        "CANINE": (lambda: t.CanineForSequenceClassification(t.CanineConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_hash_functions=2,
            num_hash_buckets=64, downsampling_rate=2, local_transformer_stride=4, num_labels=3)), tokens, (16,)),
        "ESM": (lambda: t.EsmForSequenceClassification(t.EsmConfig(pad_token_id=1, mask_token_id=2, **TEXT)),
                tokens, (12,)),
        "Mixtral (MoE)": (lambda: t.MixtralForSequenceClassification(t.MixtralConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, num_labels=3,
            max_position_embeddings=64)), tokens, (12,)),
        "GPT-NeoX": (lambda: t.GPTNeoXForSequenceClassification(t.GPTNeoXConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=3, pad_token_id=0, max_position_embeddings=64)), tokens, (12,)),
        "Phi": (lambda: t.PhiForSequenceClassification(t.PhiConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=3, pad_token_id=0, max_position_embeddings=64)), tokens, (12,)),
        "Gemma": (lambda: t.GemmaForSequenceClassification(t.GemmaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=64, num_labels=3, pad_token_id=0, max_position_embeddings=64)),
            tokens, (12,)),
        "Reformer": (lambda: t.ReformerForSequenceClassification(t.ReformerConfig(
            vocab_size=100, hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64,
            attn_layers=["local", "lsh"], axial_pos_shape=[4, 4], axial_pos_embds_dim=[16, 16],
            local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2, max_position_embeddings=16,
            num_labels=3, pad_token_id=0, is_decoder=False)), tokens, (16,)),
        "Switch Transformers (MoE encoder)": (lambda: _MeanTokenHead(t.SwitchTransformersEncoderModel(
            t.SwitchTransformersConfig(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                       num_experts=4, expert_capacity=64, num_sparse_encoder_layers=1,
                                       pad_token_id=0)), 32), tokens, (12,)),
        "Qwen2-MoE": (lambda: t.Qwen2MoeForSequenceClassification(t.Qwen2MoeConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            num_experts=4, num_experts_per_tok=2, pad_token_id=0, num_labels=3, max_position_embeddings=64)),
            tokens, (12,)),
        "Mamba": (lambda: _LastToken(t.MambaForCausalLM(t.MambaConfig(
            vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4))),
            tokens, (12,)),
        "RWKV": (lambda: _LastToken(t.RwkvForCausalLM(t.RwkvConfig(
            vocab_size=100, context_length=16, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
            intermediate_size=64, use_cache=False))), tokens, (12,)),
        "Perceiver": (lambda: t.PerceiverForSequenceClassification(t.PerceiverConfig(
            num_latents=8, d_latents=32, d_model=32, num_blocks=1, num_self_attends_per_block=1,
            num_self_attention_heads=2, num_cross_attention_heads=1, vocab_size=262, max_position_embeddings=16,
            num_labels=3)), tokens, (16,)),
        "PatchTST (time series)": (lambda: _PredictionLogits(t.PatchTSTForClassification(t.PatchTSTConfig(
            num_input_channels=3, context_length=32, patch_length=8, patch_stride=8, d_model=16, num_attention_heads=2,
            num_hidden_layers=1, ffn_dim=32, num_targets=3))), "series", (32, 3)),
        "TimeSformer (video)": (lambda: t.TimesformerForVideoClassification(t.TimesformerConfig(
            image_size=32, patch_size=8, num_frames=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, **IMAGE)), "video", (2, 3, 32, 32)),
        "VideoMAE (video)": (lambda: t.VideoMAEForVideoClassification(t.VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=2, tubelet_size=2, hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64, **IMAGE)), "video", (2, 3, 32, 32)),
        "Falcon": (lambda: t.FalconForSequenceClassification(t.FalconConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3,
            pad_token_id=0)), tokens, (12,)),
        "GPT-J": (lambda: t.GPTJForSequenceClassification(t.GPTJConfig(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64, num_labels=3,
            pad_token_id=0, bos_token_id=1, eos_token_id=1)), tokens, (12,)),
        "CodeGen": (lambda: _LastToken(t.CodeGenForCausalLM(t.CodeGenConfig(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64, n_ctx=64, bos_token_id=1,
            eos_token_id=1))), tokens, (12,)),
        "StableLM": (lambda: t.StableLmForSequenceClassification(t.StableLmConfig(
            num_key_value_heads=2, pad_token_id=0, **TEXT)), tokens, (12,)),
        "Gemma2": (lambda: t.Gemma2ForSequenceClassification(t.Gemma2Config(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=64, num_labels=3, pad_token_id=0, max_position_embeddings=64,
            sliding_window=4)), tokens, (12,)),
        "GPTBigCode": (lambda: t.GPTBigCodeForSequenceClassification(t.GPTBigCodeConfig(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, pad_token_id=0)),
            tokens, (12,)),
        "Data2VecAudio": (lambda: t.Data2VecAudioForSequenceClassification(t.Data2VecAudioConfig(**SPEECH)), "audio",
                          (1600,)),
        "UniSpeech": (lambda: t.UniSpeechForSequenceClassification(t.UniSpeechConfig(**SPEECH)), "audio", (1600,)),
        "Gemma causal LM (tied head)": (lambda: _LastToken(t.GemmaForCausalLM(t.GemmaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=64, max_position_embeddings=64))), tokens, (12,)),
        "BART LM head (tied)": (lambda: _LastToken(t.BartForConditionalGeneration(t.BartConfig(
            vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, scale_embedding=True))), tokens, (12,)),
        "MRA": (lambda: t.MraForSequenceClassification(t.MraConfig(**TEXT)), tokens, (12,)),
        "YOSO": (lambda: t.YosoForSequenceClassification(t.YosoConfig(**TEXT)), tokens, (12,)),
    }


def batch(kind: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if kind in ("image", "audio", "series", "video", "segmentation"):
        inputs = torch.randn(8, *shape, generator=generator)
    else:  # ids from 3 up: below are the configs' pad/bos/eos ids
        inputs = torch.randint(3, 100, (8, *shape), generator=generator)
        if kind == "tokens+eos":  # models that pool at the end-of-sequence token (id 2)
            inputs[:, -1] = 2
    # a class per pixel of the segmentation logits (a quarter of the image's side), else per sample
    per_sample = (shape[1] // 4, shape[2] // 4) if kind == "segmentation" else ()
    return inputs, torch.randint(0, 3, (8, *per_sample), generator=generator)


def largest_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """max |dL/dW| of the first sample over the counted weights (model as GradSign scores it)."""
    plain = scoring_mode(_Logits(copy.deepcopy(model)))
    weights = [m.weight for _, m in counted_layers(plain)]
    grads = torch.autograd.grad(F.cross_entropy(plain(x[:1]), y[:1]), weights, allow_unused=True)
    return max((float(g.abs().max()) for g in grads if g is not None), default=0.0)


def measure(build, kind: str, shape: tuple[int, ...]) -> dict:
    torch.manual_seed(0)
    model = build()
    x, y = batch(kind, shape)
    params = sum(p.numel() for p in model.parameters())
    row = {"params": params, "counted_share": sum(m.weight.numel() for _, m in counted_layers(model)) / params}
    try:
        value, warned = score_with_warnings(model, x, y)
    except ValueError as error:  # a model GradSign refuses
        return {**row, "refused": str(error).splitlines()[0]}
    loop = gradsign.score(model, x, y, engine="loop")
    noise = rounding_noise_share(model, x, y)
    model64 = model.double()
    x64 = x.double() if x.is_floating_point() else x
    row = {**row, "relative_to_loop": (value - loop) / abs(loop) if loop else float("nan"),
           "causes": sorted({m.removeprefix("gradsign: ") for m in warned}), "rounding_noise": noise}
    try:
        value64, warned64 = score_with_warnings(model64, x64, y)
        loop64 = gradsign.score(model64, x64, y, engine="loop")
    except RuntimeError as error:  # kernels without float64 (e.g. grouped matrix products of MoE layers)
        return {**row, "no_float64": str(error).splitlines()[0]}
    if math.isnan(value64) or math.isnan(loop64):
        return {**row, "no_float64": "its float64 gradients are NaN, GradSign NaN"}
    causes = sorted({m.removeprefix("gradsign: ") for m in warned + warned64})
    return {**row,
            "float64_equal": value64 == loop64, "relative64": (value64 - loop64) / abs(loop64) if loop64 else 0.0,
            "float64_differences": float64_diagnosis(model64, x64, y) if value64 != loop64 else [],
            "largest_gradient64": largest_gradient(model64, x64, y), "causes": causes}


def table(rows: dict[str, dict], command: str) -> str:
    import transformers

    lines = [f"Command: `{command}` (torch {torch.__version__}, transformers {transformers.__version__}, "
             f"the engine at {engine_version()}).", "",
             "| family | params | counted share | default vs loop, float32 | float64 equal | largest float64 gradient "
             "| fallback (cause) or refusal |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | | | | | | error: {r['error']} |")
            continue
        head = f"| {name} | {r['params']:,} | {r['counted_share']:.0%} |"
        if "refused" in r:
            lines.append(f"{head} | | | refused: {r['refused'].replace('|', '/')} |")
            continue
        cause = ("; ".join(r["causes"]).replace("|", "/") or "no") + rounding_note(r.get("rounding_noise"))
        if "no_float64" in r:
            lines.append(f"{head} {r['relative_to_loop']:+.1e} | does not run in float64 "
                         f"({r['no_float64'].replace('|', '/')}) | | {cause} |")
            continue
        equal = "yes" if r["float64_equal"] else f"NO ({r['relative64']:+.1e})"
        lines.append(f"{head} {r['relative_to_loop']:+.1e} | {equal} | {r['largest_gradient64']:.1e} | {cause} |")
    unequal = {name: r for name, r in rows.items() if r.get("float64_differences")}
    if unequal:
        lines += ["", "Where the float64 counts differ (per layer: sum of |count difference| / weights):", ""]
        for name, r in unequal.items():
            layers = r["float64_differences"]
            shown = "; ".join(f"`{d['layer']}` {d['differing_counts']:,} / {d['weights']:,}" for d in layers[:3])
            lines.append(f"- {name}: {len(layers)} layer(s): {shown}" + ("; ..." if len(layers) > 3 else ""))
    return "\n".join(lines)


def main() -> None:
    import shlex

    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated names (default: all)")
    parser.add_argument("--write", action="store_true", help="put the table into docs/performance.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    families = _families(transformers)
    names = args.families.split(",") if args.families else list(families)
    unknown = [n for n in names if n not in families]
    if unknown:
        sys.exit(f"unknown families: {', '.join(unknown)}; known: {', '.join(families)}")
    rows = {}
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows[name] = measure(*families[name])
        except Exception as error:  # a family this transformers version cannot build is a row, not a crash
            rows[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    body = table(rows, ("python bench/families.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])).strip())
    print(body)
    if args.write:
        write_section(ROOT / "docs" / "performance.md", BEGIN, END, body, INTRO)


if __name__ == "__main__":
    main()
