"""The registry service: agents, their capabilities, and the credentials allowed to change them."""
