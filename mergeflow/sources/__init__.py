"""What the inputs are, from headers alone: model references, tensor headers, architectures."""
