"""The review page (`captioner review`): look at a job's captions in a browser, correct them, and train on them."""
