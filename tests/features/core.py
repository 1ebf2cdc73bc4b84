from harness import register

register("plain")
