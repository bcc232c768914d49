"""Mixture of experts: a router picks k experts per token, a dispatcher moves the tokens to the ranks that hold
those experts, the experts run, and the dispatcher brings the weighted outputs back (Megatron-core's layout)."""
