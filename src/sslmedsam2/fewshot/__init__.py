"""Training-free few-shot pseudo-labels (TFFS): labelled support volumes segment unlabelled queries, no prompt."""
