"""torch.fx passes that know no method: tracing, head/body/tail partition, module swapping."""
