"""The built-in demo's world: synthetic verifiable tasks (:mod:`thinkvl.demo.tasks`), their program
teacher (:mod:`thinkvl.demo.teacher`) and their answer formats. The library layers (data, train, rl,
distill, eval) know nothing about these tasks; the demo reaches them through the same hooks a user's
own data and teacher would use."""
