"""Package data, found through importlib.resources so that a wheel install has it too:
`libero_object_frames.npz`, recorded real LIBERO frames (rtloop.sim.record) for `--sim replay` and `rtloop bench`."""
