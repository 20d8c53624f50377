from dbsync.cli.main import main

main()
