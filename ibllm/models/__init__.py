"""Model definitions: LLaMA decoder, bind network, ImageBind encoders, Point-Bind."""
