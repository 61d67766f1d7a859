"""The Dynamo Planner's side: the virtual-connector executor it drives and the
connector interface it calls."""
