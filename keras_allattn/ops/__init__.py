from keras_allattn.ops.attention import all_attention
from keras_allattn.ops.attention import portable_all_attention
from keras_allattn.ops.attention import span_mask
