from tfkit.cli import main

main()
