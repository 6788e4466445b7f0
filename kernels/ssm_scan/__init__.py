"""Selective scan (Mamba's SSM): reference, XLA, Pallas GPU and TPU kernels behind one entry point."""
from kernels.ssm_scan.api import IMPLS, selective_scan
from kernels.ssm_scan.gpu import GpuBlocks
from kernels.ssm_scan.reference import step
from kernels.ssm_scan.tpu import TpuBlocks

__all__ = ["selective_scan", "step", "IMPLS", "GpuBlocks", "TpuBlocks"]
