"""Decoding drivers: pure logic over a `step(start_pos, tokens, num_outputs)` coroutine that
runs one chunk through the target model and returns the argmax ids of its last positions."""
