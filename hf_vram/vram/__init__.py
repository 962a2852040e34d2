"""Memory and time: predict a recipe's peak VRAM from its config (estimate), measure a real step (measure), fit it to a card."""
