"""Training engines shared by the trainer plugins: the session (devices, checkpoints, resume, metrics), the SFT
loop, the RL loop and RFT, and the pure RL algorithms."""
