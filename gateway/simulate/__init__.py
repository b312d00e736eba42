"""The carrier emulator behind ``voxray simulate`` and the tests: a tool package the server never imports."""
