from bemi_asgi.cli import main

main()
