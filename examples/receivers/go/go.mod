module hookrelay.dev/examples/receiver

go 1.22
