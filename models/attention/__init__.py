"""Attention kernels: dilated (LongNet) and the backends that compute it."""

from models.attention.dilated import DilatedAttention, dilated_attention

__all__ = ["DilatedAttention", "dilated_attention"]
