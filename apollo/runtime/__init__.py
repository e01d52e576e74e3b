"""Running a training: the loop (``train``), resumable checkpoints, data parallelism under torchrun,
SIGTERM pre-emption, the peak-memory check made before anything is allocated, the experiment trackers,
and ``ApolloTrainer`` (the same method inside a user's ``transformers.Trainer``).
"""
