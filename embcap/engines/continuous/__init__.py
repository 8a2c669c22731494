"""The continuous engine: iteration-level batching over a slot KV cache (`engine`), the rows decoding
together and their shared prefill (`running_batch`), one step of the decoder over the slots with CUDA
graphs on a GPU (`slot_decoder`)."""
