"""What every runner leaves in its output directory, written the same way for every kind of training: the summary
(written last: its presence means the run finished), the model card, the memory log, crash-safe checkpoints, the
non-finite-loss stop, and the push to the Hub."""
