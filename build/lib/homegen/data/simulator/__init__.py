"""The synthetic Home-page world: catalog and users, shelf rules, the true response model, logging and
oracle policies, and the simulator that writes page logs from them. It is also the evaluation oracle."""
