"""The mpx training application: config -> data -> loop -> checkpoints -> logs, and its CLI."""
