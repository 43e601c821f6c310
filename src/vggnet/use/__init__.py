"""The verbs that use a trained model: predict, features, perceptual loss, explain (Grad-CAM), export, compress.
Each takes a loaded model and a runtime; cli/ only parses their arguments and prints their results."""
