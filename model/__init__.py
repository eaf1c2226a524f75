"""The captioning model: loading a checkpoint, preprocessing, the exact batched decoder, speed profiles and checks
on a generated caption. Knows nothing of queues or Redis."""
