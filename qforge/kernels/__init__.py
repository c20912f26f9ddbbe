"""Kernels: the hot loops of 4-bit (de)quantisation, one pure-torch reference and fast paths.

`dispatch` is the only module that chooses an implementation; callers never branch on device.
"""
