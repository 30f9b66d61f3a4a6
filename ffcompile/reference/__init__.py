"""The PyTorch reference: the interpreter that defines what programs mean, the reference trainer,
the autograd oracle, the parity harness and plots."""
