"""Test corpora from outside presso: PyTorch's OpInfo database, ONNX's backend test data, Hugging
Face models from small configs. Each module can also be run directly to list its failures."""
