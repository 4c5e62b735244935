"""Transport methods: naive addition, GradFix, the adaptive choice, TransFusion and Theseus."""
